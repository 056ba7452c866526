//! Encryption at rest: the key that unlocks the database file, and where the
//! file is (docs/storage.md, Encryption at rest).
//!
//! Owns [`StoreKey`] (the secret, read from `store.key_file`) and
//! [`Database`] (the path with its key), which every connection is opened
//! from: the writer's, the readers' and the CLI's.
//!
//! Invariants:
//! - A connection of an encrypted database is keyed before its first
//!   statement: SQLCipher reads nothing of the file until then.
//! - The key never appears in logs, errors, `Debug` output or the
//!   configuration shown by `check-config`.
//! - With no key the file is plain SQLite, byte for byte what it was before
//!   SQLCipher was built in; with a key every page of the database and its
//!   WAL is encrypted (SQLCipher 4's defaults: AES-256, HMAC-SHA512 per
//!   page, PBKDF2 key derivation).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, OpenFlags};

use super::error::open_error;
use super::open::BUSY_TIMEOUT;
use super::StoreError;
use crate::config::StoreConfig;

/// The passphrase from `store.key_file` (trailing newlines removed).
#[derive(Clone)]
pub(crate) struct StoreKey(Arc<str>);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(<redacted>)")
    }
}

impl StoreKey {
    /// Reads the key file: made for systemd credentials, like
    /// `broker.password_file`. An empty key is refused: SQLCipher would
    /// take it as "no encryption" and write a plain file.
    pub(crate) fn read(path: &Path) -> Result<StoreKey, StoreError> {
        let text = std::fs::read_to_string(path).map_err(|e| StoreError::KeyFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let key = text.trim_end_matches(['\r', '\n']);
        if key.is_empty() {
            return Err(StoreError::KeyFile {
                path: path.to_path_buf(),
                reason: "the file is empty".into(),
            });
        }
        Ok(StoreKey(key.into()))
    }

    /// Keys `conn`; must be its first statement.
    pub(crate) fn apply(&self, conn: &Connection) -> rusqlite::Result<()> {
        conn.pragma_update(None, "key", &*self.0)
    }
}

/// The database file and the key that unlocks it, if it is encrypted.
#[derive(Debug, Clone)]
pub struct Database {
    pub(crate) path: PathBuf,
    pub(crate) key: Option<StoreKey>,
}

impl Database {
    /// The configured database: `store.path`, keyed by `store.key_file`.
    pub(crate) fn from_config(config: &StoreConfig) -> Result<Database, StoreError> {
        let key = config.key_file.as_deref().map(StoreKey::read).transpose()?;
        Ok(Database {
            path: config.path.clone(),
            key,
        })
    }

    /// A plain (unencrypted) database at `path`.
    pub fn plain(path: impl Into<PathBuf>) -> Database {
        Database {
            path: path.into(),
            key: None,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Keys a freshly opened connection (nothing for a plain database).
    pub(crate) fn unlock(&self, conn: &Connection) -> rusqlite::Result<()> {
        match &self.key {
            Some(key) => key.apply(conn),
            None => Ok(()),
        }
    }

    /// Opens an existing database with `flags`, keyed, with the busy
    /// timeout, and reads it once: the header (garbage is "not a
    /// database", and so is a wrong key) and the schema (a damaged one is
    /// "malformed") fail here, as [`Database::first_read_error`] words them.
    pub(crate) fn connect(&self, flags: OpenFlags) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(&self.path, flags)
            .map_err(|e| open_error(&self.path, e))?;
        self.unlock(&conn)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(|e| self.first_read_error(e))?;
        Ok(conn)
    }

    /// What a failed first read of the file means: "not a database" is a
    /// wrong key when there is one (the file is not called corrupt), and
    /// may be an encrypted file when there is none.
    pub(crate) fn first_read_error(&self, e: rusqlite::Error) -> StoreError {
        let not_a_database = e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase);
        match (&self.key, StoreError::from(e)) {
            (Some(_), _) if not_a_database => StoreError::WrongKey {
                path: self.path.clone(),
            },
            (None, StoreError::Corrupt { details, .. }) if not_a_database => StoreError::Corrupt {
                path: self.path.clone(),
                details: format!("{details}; if the file is encrypted, set store.key_file"),
            },
            (_, StoreError::Corrupt { details, .. }) => StoreError::Corrupt {
                path: self.path.clone(),
                details,
            },
            (_, other) => other,
        }
    }
}
