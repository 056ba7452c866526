//! Backlog: which rows the forwarder publishes next (docs/forwarding.md,
//! Passes).
//!
//! Role: the forwarder never keeps messages of its own; it walks `msg_log`.
//! A **pass** walks every delivering row whose `next_try_time` has passed
//! and whose expiry has not, highest priority first and, within a priority,
//! in insertion order (`publish.order = "oldest_first"`) or its reverse
//! (`"newest_first"`), a page at a time, skipping rows already in flight.
//! The first publish of a new row and every re-publish are the same thing:
//! a row a pass reaches. A pass has no horizon, so no row that is due is
//! ever left behind (unlike a resend job that looks only at rows due in the
//! last few minutes).
//!
//! Owns: [`Backlog`], the pass cursor (a priority and a rowid), the current
//! page and the read of the next one. The forwarder owns one and asks it
//! for the next row. New rows that sort after the cursor continue the
//! current pass; new rows that sort before it (a higher priority than the
//! cursor's, or any new row of the cursor's priority when newest first)
//! make the next page read start again from the head of the backlog, so
//! they wait at most for the page already read (docs/decisions/0030).
//! [`Backlog::rewind`] starts a new pass from the head (after a reconnect,
//! a reopened channel, and on every pass request).
//!
//! Invariants:
//! - Memory is one page plus the in-flight window, whatever the backlog
//!   size: rows are read in pages of [`PAGE_SIZE`] by a cursor, each page
//!   an index range scan per priority (no sort; `store/reader.rs`).
//! - A row read twice (a page re-read from the head) is handed out once:
//!   the ledger holds it from the first hand-out until its outcome is
//!   committed, and a copy read before that commit is stale.
//! - After a restart every delivering row is due at once (`next_try_time`
//!   only delays failed attempts, and a new agent starts with a full pass).
//! - [`Backlog::next`] is cancel-safe: the forwarder polls it in a
//!   `select!`, and a page read in progress survives for the next call.

use std::collections::VecDeque;

use tokio::task::JoinHandle;

use super::ledger::Ledger;
use crate::config::Order;
use crate::store::{now_ms, Cursor, OutgoingRow, Reader, StoreError};

/// Rows read per page.
pub(crate) const PAGE_SIZE: usize = 512;

/// The forwarder's walk over due rows.
pub(crate) struct Backlog {
    reader: Reader,
    order: Order,
    /// Rows up to this one (in the backlog's order) were read by the
    /// current pass.
    cursor: Cursor,
    /// New rows sort before the cursor: the next read starts at the head.
    look_back: bool,
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
    pub(crate) fn new(reader: Reader, order: Order) -> Self {
        Backlog {
            reader,
            order,
            cursor: Cursor::START,
            look_back: false,
            page: VecDeque::new(),
            reads: 0,
            reading: None,
            exhausted: false,
            more_since_read: false,
            handed_out: 0,
        }
    }

    /// Starts a new pass from the head of the backlog.
    pub(crate) fn rewind(&mut self) {
        self.cursor = Cursor::START;
        self.look_back = false;
        self.page.clear();
        // A read in progress belongs to the old pass; its result is dropped.
        self.reading = None;
        self.exhausted = false;
        self.handed_out = 0;
    }

    /// New rows were committed, the highest of priority `top` (`None`:
    /// not known to the caller, taken as the highest): the current pass
    /// goes on past its end, and looks back to the head when they sort
    /// before the cursor.
    pub(crate) fn more_rows(&mut self, top: Option<u8>) {
        self.exhausted = false;
        self.more_since_read = true;
        if let Some(top) = top {
            self.look_back |= sorts_before(top, self.cursor, self.order);
        }
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
        if std::mem::take(&mut self.look_back) {
            self.cursor = Cursor::START;
        }
        let reader = self.reader.clone();
        let after = self.cursor;
        let order = self.order;
        self.more_since_read = false;
        self.reads += 1;
        self.reading = Some(tokio::task::spawn_blocking(move || {
            reader.due_page(after, order, now_ms(), PAGE_SIZE)
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
                Some(last) => {
                    self.cursor = Cursor {
                        priority: last.priority,
                        rowid: Some(last.rowid),
                    }
                }
                None if self.more_since_read => {}
                None => self.exhausted = true,
            }
            let read = self.reads;
            self.page.extend(page.into_iter().map(|row| (read, row)));
        }
    }
}

/// Whether a row committed now with priority `priority` sorts before
/// `cursor` in `order` (a new row has the highest rowid so far).
fn sorts_before(priority: u8, cursor: Cursor, order: Order) -> bool {
    if cursor.rowid.is_none() && cursor.priority == Cursor::START.priority {
        return false;
    }
    match order {
        Order::OldestFirst => priority > cursor.priority,
        Order::NewestFirst => priority >= cursor.priority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rows_look_back_only_when_they_sort_before_the_cursor() {
        let at = |priority, rowid| Cursor { priority, rowid };
        // Nothing read yet: the next read starts at the head anyway.
        assert!(!sorts_before(9, Cursor::START, Order::OldestFirst));
        assert!(!sorts_before(9, Cursor::START, Order::NewestFirst));
        // Oldest first: a new row of the cursor's priority comes after it.
        assert!(!sorts_before(3, at(3, Some(10)), Order::OldestFirst));
        assert!(!sorts_before(2, at(3, Some(10)), Order::OldestFirst));
        assert!(sorts_before(4, at(3, Some(10)), Order::OldestFirst));
        assert!(sorts_before(4, at(3, None), Order::OldestFirst));
        // Newest first: a new row of the cursor's priority is the newest.
        assert!(sorts_before(3, at(3, Some(10)), Order::NewestFirst));
        assert!(!sorts_before(2, at(3, Some(10)), Order::NewestFirst));
        assert!(sorts_before(9, at(9, Some(10)), Order::NewestFirst));
    }
}
