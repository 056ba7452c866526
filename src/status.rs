//! Status: what `edge-outbox status` and `{"op":"status"}` report.
//!
//! Role: one [`StatusReport`] shape for both sources, the running agent
//! (which adds the broker connection) and the database alone (agent down).
//! Owns [`BrokerState`], the forwarder's live view of its connection, shared
//! with whoever reports status.
//!
//! Invariant: nothing in a report carries a password (URLs are redacted
//! before they are stored here).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::store::{self, Reader, StatusCounts, StoreError};

/// The forwarder's connection as last seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct BrokerStatus {
    pub connected: bool,
    /// The broker's URL without its password.
    pub url: Option<String>,
    /// Epoch ms since when `connected` has held its value.
    pub since: Option<i64>,
    /// Messages published and not yet confirmed.
    pub in_flight: u64,
    /// Why the last connection attempt or connection failed.
    pub last_error: Option<String>,
    /// The broker asked publishers to pause (memory or disk alarm).
    #[serde(default)]
    pub blocked: bool,
    /// The rate cap is holding publishing back: rows are waiting and the
    /// cap held one back within the last second (docs/forwarding.md, The
    /// rate cap).
    #[serde(default)]
    pub throttled: bool,
    /// `publish.max_rate` (messages/s); `None`: no cap.
    #[serde(default)]
    pub max_rate: Option<u32>,
    /// `publish.max_bytes_rate` (bytes/s); `None`: no cap.
    #[serde(default)]
    pub max_bytes_rate: Option<u64>,
    /// Time spent waiting for the rate cap since the agent started, in ms.
    #[serde(default)]
    pub throttled_ms: u64,
}

/// Shared, cheap to clone; written by the forwarder, read by status.
#[derive(Debug, Clone, Default)]
pub(crate) struct BrokerState(Arc<Mutex<BrokerStatus>>);

impl BrokerState {
    pub(crate) fn get(&self) -> BrokerStatus {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub(crate) fn update(&self, change: impl FnOnce(&mut BrokerStatus)) {
        if let Ok(mut s) = self.0.lock() {
            change(&mut s);
        }
    }
}

/// The answer of `status --json` and `{"op":"status"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StatusReport {
    /// "agent" when a running agent answered, "database" when read from the file.
    pub source: String,
    pub version: String,
    pub counts: StatusCounts,
    /// Age in ms of the oldest delivering message (status 0).
    pub oldest_delivering_age_ms: Option<i64>,
    /// Present when the agent answered.
    pub broker: Option<BrokerStatus>,
    pub db_path: String,
    pub db_size_bytes: u64,
    pub free_disk_bytes: Option<u64>,
    /// Delivering rows per priority, only the priorities that have some
    /// (keys "0" to "9").
    #[serde(default)]
    pub delivering_by_priority: BTreeMap<u8, u64>,
    /// Rows that expired before they could be published (failed, `last_error`
    /// "expired"), still in the database.
    #[serde(default)]
    pub expired: u64,
}

impl StatusReport {
    /// Reads the database's part of the report; `broker` is the agent's part.
    pub(crate) fn collect(
        reader: &Reader,
        broker: Option<&BrokerState>,
    ) -> Result<Self, StoreError> {
        let counts = reader.counts()?;
        let oldest = reader.oldest_delivering()?;
        let (backlog, expired) = reader.backlog()?;
        Ok(StatusReport {
            source: if broker.is_some() {
                "agent"
            } else {
                "database"
            }
            .into(),
            version: env!("CARGO_PKG_VERSION").into(),
            counts,
            oldest_delivering_age_ms: oldest.map(|t| (store::now_ms() - t).max(0)),
            broker: broker.map(BrokerState::get),
            db_path: reader.path().display().to_string(),
            db_size_bytes: reader.db_size(),
            free_disk_bytes: store::free_disk(reader.path()),
            delivering_by_priority: (0..=store::MAX_PRIORITY)
                .zip(backlog.by_priority)
                .filter(|(_, n)| *n > 0)
                .collect(),
            expired,
        })
    }
}
