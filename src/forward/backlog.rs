//! Backlog: which rows the forwarder publishes next (docs/forwarding.md,
//! Passes).
//!
//! Role: the forwarder never keeps messages of its own; it walks `msg_log`.
//! A **pass** walks every delivering row whose `next_try_time` has passed,
//! in insertion order, a page at a time, skipping rows already in flight.
//! The first publish of a new row and every re-publish are the same thing:
//! a row a pass reaches. A pass has no horizon, so no row that is due is
//! ever left behind (unlike a resend job that looks only at rows due in the
//! last few minutes).
//!
//! Owns: [`Backlog`], the pass cursor (a rowid), the current page and the
//! read of the next one. The forwarder owns one and asks it for the next
//! row. New rows continue the current pass from the cursor;
//! [`Backlog::rewind`] starts a new pass from the oldest row (after a
//! reconnect, a reopened channel, and on every pass request).
//!
//! Invariants:
//! - Memory is one page plus the in-flight window, whatever the backlog
//!   size: rows are read in pages of [`PAGE_SIZE`] by a cursor.
//! - After a restart every delivering row is due at once (`next_try_time`
//!   only delays failed attempts, and a new agent starts with a full pass).
//! - [`Backlog::next`] is cancel-safe: the forwarder polls it in a
//!   `select!`, and a page read in progress survives for the next call.

use std::collections::VecDeque;

use tokio::task::JoinHandle;

use super::ledger::Ledger;
use crate::store::{now_ms, OutgoingRow, Reader, StoreError};

/// Rows read per page.
pub(crate) const PAGE_SIZE: usize = 512;

/// The forwarder's walk over due rows.
pub(crate) struct Backlog {
    reader: Reader,
    /// Rows with a rowid up to this one were read by the current pass.
    cursor: i64,
    /// The rows of the current page, each with the number of the read
    /// that produced it (see [`Ledger::stale`]).
    page: VecDeque<(u64, OutgoingRow)>,
    /// Page reads started so far.
    reads: u64,
    /// The next page, being read on the blocking pool. Kept across
    /// cancellations of [`Backlog::next`], and started before the current
    /// page runs out, so the publisher never waits on the disk for long.
    reading: Option<JoinHandle<Result<Vec<OutgoingRow>, StoreError>>>,
    /// The current pass found nothing more; new rows or a rewind wake it.
    exhausted: bool,
    /// New rows were committed since the page read in progress started: an
    /// empty answer from that read says nothing about them, so it must not
    /// end the pass (the lost wakeup: a row committed during a read would
    /// otherwise wait for the next resend pass).
    more_since_read: bool,
    /// Rows handed out by the current pass.
    handed_out: u64,
}

impl Backlog {
    pub(crate) fn new(reader: Reader) -> Self {
        Backlog {
            reader,
            cursor: 0,
            page: VecDeque::new(),
            reads: 0,
            reading: None,
            exhausted: false,
            more_since_read: false,
            handed_out: 0,
        }
    }

    /// Starts a new pass from the oldest row.
    pub(crate) fn rewind(&mut self) {
        self.cursor = 0;
        self.page.clear();
        // A read in progress belongs to the old pass; its result is dropped.
        self.reading = None;
        self.exhausted = false;
        self.handed_out = 0;
    }

    /// New rows were committed: the current pass goes on past its end.
    pub(crate) fn more_rows(&mut self) {
        self.exhausted = false;
        self.more_since_read = true;
    }

    /// Nothing to hand out until new rows or a rewind.
    pub(crate) fn exhausted(&self) -> bool {
        self.exhausted && self.page.is_empty() && self.reading.is_none()
    }

    /// Page reads started so far: an outcome committed now may be missing
    /// from every page read up to this one.
    pub(crate) fn reads(&self) -> u64 {
        self.reads
    }

    /// The oldest page read whose rows are still to be handed out.
    pub(crate) fn oldest_read_in_use(&self) -> u64 {
        self.page.front().map_or(self.reads, |(read, _)| *read)
    }

    /// Rows handed out since the last rewind.
    pub(crate) fn handed_out(&self) -> u64 {
        self.handed_out
    }

    fn start_read(&mut self) {
        let reader = self.reader.clone();
        let after = self.cursor;
        self.more_since_read = false;
        self.reads += 1;
        self.reading = Some(tokio::task::spawn_blocking(move || {
            reader.due_page(after, now_ms(), PAGE_SIZE)
        }));
    }

    /// The next due row the ledger does not hold, or `None` when the pass
    /// is done. Cancel-safe: a page read in progress is kept for the next
    /// call.
    pub(crate) async fn next(
        &mut self,
        ledger: &Ledger,
    ) -> Result<Option<OutgoingRow>, StoreError> {
        loop {
            if self.page.len() < PAGE_SIZE / 4 && self.reading.is_none() && !self.exhausted {
                self.start_read();
            }
            while let Some((read, row)) = self.page.pop_front() {
                if !ledger.holds(&row.id) && !ledger.stale(&row.id, read) {
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
                None if self.more_since_read => {}
                None => self.exhausted = true,
            }
            let read = self.reads;
            self.page.extend(page.into_iter().map(|row| (read, row)));
        }
    }
}
