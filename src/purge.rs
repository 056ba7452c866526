//! Purge: deletes old settled rows so the database stays small
//! (docs/purge.md).
//!
//! Role: daily at `purge.at` (local time), and on demand (`edge-outbox
//! purge`), delete rows created more than `purge.retention` ago whose status
//! is 1 (delivered) or 3 (consumed), and status-2 (failed) rows created more
//! than `purge.failed_retention` ago; then hand the freed pages back to the
//! filesystem (incremental vacuum, run to the end of the freelist in bounded
//! slices: the agent's writer between its groups, the CLI between batches).
//! Making room under `store.max_db_size` is the store's (`store/room.rs`).
//!
//! Invariants:
//! - Status 0 is never deleted: the purge's SQL cannot select it.
//! - At most `purge.batch_size` rows per transaction, so a submit waits for
//!   one small batch at most, never for the whole purge.
//! - A purge that fails part-way leaves consistent data: each batch is
//!   committed or not; the next run goes on.

use std::time::Duration;

use chrono::{DateTime, Local, TimeZone};
use tokio_util::sync::CancellationToken;

use crate::config::{PurgeConfig, TimeOfDay};
use crate::store::{now_ms, Admin, PurgeCutoffs, Reader, StatusCounts, Store, StoreError};

/// The CLI's pause between batches and between reclaim slices (it shares
/// the database with the agent).
const BATCH_PAUSE: Duration = Duration::from_millis(5);
/// The work one reclaim slice of the CLI does at most, as the agent's
/// writer (docs/purge.md, How).
const RECLAIM_BUDGET: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub(crate) enum PurgeError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one purge did (or, dry, would do).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PurgeReport {
    /// Rows deleted (or, dry, deletable) per status.
    pub deleted: StatusCounts,
    pub batches: u64,
}

/// The cutoffs for a purge at `now` (epoch ms).
pub(crate) fn cutoffs(config: &PurgeConfig, now: i64) -> PurgeCutoffs {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    PurgeCutoffs {
        settled_before: now.saturating_sub(ms(config.retention)),
        failed_before: now.saturating_sub(ms(config.failed_retention)),
    }
}

/// The purge job of the running agent: its deletes go through the store's
/// writer, one batch per transaction.
pub(crate) struct Purge {
    config: PurgeConfig,
    store: Store,
}

impl Purge {
    pub(crate) fn new(config: PurgeConfig, store: Store) -> Self {
        Purge { config, store }
    }

    /// One whole purge, batch after batch.
    pub(crate) async fn run_once(&self) -> Result<PurgeReport, PurgeError> {
        let cutoffs = cutoffs(&self.config, now_ms());
        let mut report = PurgeReport::default();
        loop {
            let deleted = self
                .store
                .purge_batch(cutoffs, self.config.batch_size.get())
                .await?;
            report.deleted = report.deleted.plus(deleted);
            report.batches += 1;
            if deleted.total() < u64::from(self.config.batch_size.get()) {
                return Ok(report);
            }
        }
    }

    /// Purges daily at `purge.at`, local time, until `shutdown`.
    pub(crate) async fn run(self, shutdown: CancellationToken) -> Result<(), PurgeError> {
        loop {
            let wait = until_next(self.config.at, Local::now());
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
            let started = std::time::Instant::now();
            let report = self.run_once().await?;
            tracing::info!(
                delivered = report.deleted.delivered,
                consumed = report.deleted.consumed,
                failed = report.deleted.failed,
                batches = report.batches,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "purge done"
            );
        }
    }
}

/// Time from `now` to the next `at` (local). A time that does not
/// exist today (a DST gap) falls back to the next hour.
pub(crate) fn until_next<Tz: TimeZone>(at: TimeOfDay, now: DateTime<Tz>) -> Duration {
    let time = at.time();
    let tz = now.timezone();
    let mut day = now.date_naive();
    for _ in 0..3 {
        let candidate = tz
            .from_local_datetime(&day.and_time(time))
            .earliest()
            .or_else(|| {
                tz.from_local_datetime(&(day.and_time(time) + chrono::Duration::hours(1)))
                    .earliest()
            });
        if let Some(candidate) = candidate.filter(|c| *c > now) {
            return (candidate - now.clone()).to_std().unwrap_or(Duration::ZERO);
        }
        day = day.succ_opt().unwrap_or(day);
    }
    Duration::from_secs(86_400)
}

/// The CLI's purge, on its own connection (the agent may be running).
/// `dry_run` only counts.
pub(crate) fn purge_database(
    database: &crate::store::Database,
    config: &PurgeConfig,
    dry_run: bool,
) -> Result<PurgeReport, PurgeError> {
    let cutoffs = cutoffs(config, now_ms());
    if dry_run {
        let deleted = Reader::open(database)?.purgeable(cutoffs)?;
        return Ok(PurgeReport {
            deleted,
            batches: 0,
        });
    }
    let mut admin = Admin::open(database)?;
    let mut report = PurgeReport::default();
    loop {
        let deleted = admin.purge_batch(cutoffs, config.batch_size.get())?;
        // The whole freelist back, a slice at a time.
        while !admin.reclaim_slice(RECLAIM_BUDGET)? {
            std::thread::sleep(BATCH_PAUSE);
        }
        report.deleted = report.deleted.plus(deleted);
        report.batches += 1;
        if deleted.total() < u64::from(config.batch_size.get()) {
            break;
        }
        // Let a running agent's writer take the lock between batches, so
        // its submits wait for one batch at most.
        std::thread::sleep(BATCH_PAUSE);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{FixedOffset, Utc};

    fn at(text: &str) -> TimeOfDay {
        text.parse().unwrap()
    }

    #[test]
    fn next_run_is_later_today_or_tomorrow() {
        let tz = FixedOffset::east_opt(3600).unwrap();
        let now = tz.with_ymd_and_hms(2026, 11, 27, 2, 0, 0).unwrap();
        assert_eq!(until_next(at("03:00"), now), Duration::from_secs(3600));
        let now = tz.with_ymd_and_hms(2026, 11, 27, 3, 0, 0).unwrap();
        assert_eq!(until_next(at("03:00"), now), Duration::from_secs(86_400));
        let now = Utc.with_ymd_and_hms(2026, 11, 27, 23, 59, 0).unwrap();
        assert_eq!(until_next(at("00:00"), now), Duration::from_secs(60));
    }

    #[test]
    fn cutoffs_follow_the_retentions() {
        let config = PurgeConfig::default();
        let c = cutoffs(&config, 100 * 86_400_000);
        assert_eq!(c.settled_before, 70 * 86_400_000);
        assert_eq!(c.failed_before, 10 * 86_400_000);
    }
}
