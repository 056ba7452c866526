//! Resend: which rows the forwarder publishes next, and the periodic pass.
//!
//! Role: the forwarder never keeps messages of its own; it walks `msg_log`.
//! A **pass** walks every status-0 row whose `next_try_time` has passed, in
//! insertion order, a page at a time, skipping rows already in flight. The
//! first publish of a new row and every re-publish are the same thing: a row
//! a pass reaches. (The usual version's flaw, a resend job that only looked
//! at rows due in the last five minutes, cannot happen: a pass has no
//! horizon.)
//!
//! Owns:
//! - [`Backlog`]: the pass cursor (a rowid) and the current page. The
//!   forwarder owns one and asks it for the next row. New rows continue the
//!   current pass from the cursor; [`Backlog::rewind`] starts a new pass from
//!   the oldest row (after a reconnect, and on every resend tick);
//! - [`Resend`]: the timer that asks for a full pass every
//!   `publish.resend_every`; [`Resend::run_once`] asks for one pass and
//!   waits until the forwarder has published it.
//!
//! Invariants:
//! - Memory is one page plus the in-flight window, whatever the backlog
//!   size: rows are read in pages of [`PAGE_SIZE`] by a cursor.
//! - After a restart every status-0 row is due at once (`next_try_time` only
//!   delays failed attempts, and a new agent starts with a full pass).

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::store::{now_ms, OutgoingRow, Reader, StoreError};

/// Rows read per page.
pub const PAGE_SIZE: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ResendError {
    #[error("the forwarder is gone")]
    ForwarderGone,
}

/// The forwarder's walk over due rows.
pub struct Backlog {
    reader: Reader,
    /// Rows with a rowid up to this one were read by the current pass.
    cursor: i64,
    page: VecDeque<OutgoingRow>,
    /// The next page, being read on the blocking pool. Kept across
    /// cancellations of [`Backlog::next`], and started before the current
    /// page runs out, so the publisher never waits on the disk for long.
    reading: Option<JoinHandle<Result<Vec<OutgoingRow>, StoreError>>>,
    /// The current pass found nothing more; new rows or a rewind wake it.
    exhausted: bool,
    /// Rows handed out by the current pass.
    handed_out: u64,
}

impl Backlog {
    pub fn new(reader: Reader) -> Self {
        Backlog {
            reader,
            cursor: 0,
            page: VecDeque::new(),
            reading: None,
            exhausted: false,
            handed_out: 0,
        }
    }

    /// Starts a new pass from the oldest row.
    pub fn rewind(&mut self) {
        self.cursor = 0;
        self.page.clear();
        // A read in progress belongs to the old pass; its result is dropped.
        self.reading = None;
        self.exhausted = false;
        self.handed_out = 0;
    }

    /// New rows were committed: the current pass goes on past its end.
    pub fn more_rows(&mut self) {
        self.exhausted = false;
    }

    /// Nothing to hand out until new rows or a rewind.
    pub fn exhausted(&self) -> bool {
        self.exhausted && self.page.is_empty() && self.reading.is_none()
    }

    /// Rows handed out since the last rewind.
    pub fn handed_out(&self) -> u64 {
        self.handed_out
    }

    fn start_read(&mut self) {
        let reader = self.reader.clone();
        let after = self.cursor;
        self.reading = Some(tokio::task::spawn_blocking(move || {
            reader.due_page(after, now_ms(), PAGE_SIZE)
        }));
    }

    /// The next due row not in `in_flight`, or `None` when the pass is done.
    /// Cancel-safe: a page read in progress is kept for the next call.
    pub async fn next(
        &mut self,
        in_flight: &HashSet<String>,
    ) -> Result<Option<OutgoingRow>, StoreError> {
        loop {
            if self.page.len() < PAGE_SIZE / 4 && self.reading.is_none() && !self.exhausted {
                self.start_read();
            }
            while let Some(row) = self.page.pop_front() {
                if !in_flight.contains(&row.id) {
                    self.handed_out += 1;
                    return Ok(Some(row));
                }
            }
            let Some(reading) = self.reading.as_mut() else {
                return Ok(None);
            };
            let page = reading
                .await
                .map_err(|e| StoreError::WriteFailed(format!("backlog page read: {e}")));
            self.reading = None;
            let page = page??;
            match page.last() {
                Some(last) => self.cursor = last.rowid,
                None => self.exhausted = true,
            }
            self.page.extend(page);
        }
    }
}

/// Asks the forwarder for a full pass; answered when it is published.
pub struct PassRequest {
    pub reply: oneshot::Sender<PassReport>,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Rows the pass published (first publishes and re-publishes alike).
    pub published: u64,
}

/// The periodic resend job.
pub struct Resend {
    every: Duration,
    passes: mpsc::Sender<PassRequest>,
}

impl Resend {
    /// `passes` is the forwarder's request channel.
    pub fn new(every: Duration, passes: mpsc::Sender<PassRequest>) -> Self {
        Resend { every, passes }
    }

    /// One full pass: returns once the forwarder has published every row
    /// that was due (while the broker is unreachable, that waits for it).
    pub async fn run_once(&self) -> Result<PassReport, ResendError> {
        let (reply, answer) = oneshot::channel();
        self.passes
            .send(PassRequest { reply })
            .await
            .map_err(|_| ResendError::ForwarderGone)?;
        answer.await.map_err(|_| ResendError::ForwarderGone)
    }

    /// A pass every `publish.resend_every` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ResendError> {
        let mut ticks = tokio::time::interval(self.every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the forwarder starts with a pass of its own
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = ticks.tick() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                report = self.run_once() => {
                    let report = report?;
                    if report.published > 0 {
                        tracing::debug!(published = report.published, "resend pass done");
                    }
                }
            }
        }
    }
}
