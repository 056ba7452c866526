//! Making room under `store.max_db_size` (docs/storage.md, Limits and
//! Making room; decisions/0024 and 0025).
//!
//! Role: once per write group that holds new messages, measure the live
//! data (`page_count − freelist_count` pages: free pages are room already)
//! and, when it has reached the limit, purge settled rows to make room
//! before any submit is refused: delivered and consumed rows first, oldest
//! first, then failed rows older than `store.room_failed_grace`. Only when
//! nothing settled is left does the limit refuse.
//!
//! Owns the decision, pure and unit-tested ([`next_step`], [`low_water`]),
//! and the loop that applies it ([`make_room`]).
//!
//! Invariants:
//! - Never a delivering row: the slices are `write::purge_for_room`, whose
//!   SQL cannot select status 0.
//! - Inside the group's transaction: the rows purged and the rows stored
//!   commit together or not at all (a rolled-back group purged nothing).
//! - Bounded: slices of [`SLICE_ROWS`] rows; past [`SOFT_BUDGET`] it stops
//!   as soon as the live data is under the limit, and past [`HARD_BUDGET`]
//!   it stops even over it (that group's submits are refused, the next
//!   group goes on), so the writer never stalls on a large purge.
//! - Freed pages stay in the file for the new rows: making room does not
//!   shrink the file (the daily purge and its reclaim do).

use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::write::{live_size, purge_for_room};
use super::{StatusCounts, StoreError};

/// Rows deleted per slice: small enough that a slice of large bodies
/// (their overflow pages are read to be freed) stays short.
pub(crate) const SLICE_ROWS: u32 = 128;
/// Past this, making room stops as soon as the live data is under the limit.
pub(crate) const SOFT_BUDGET: Duration = Duration::from_millis(10);
/// Past this, making room stops even over the limit.
pub(crate) const HARD_BUDGET: Duration = Duration::from_millis(250);
/// Making room aims at 1/64 of the limit below it, so that a database at
/// its limit does not purge a few rows in every group.
const HEADROOM_DIVISOR: u64 = 64;

/// What to do after a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Purge another slice.
    More,
    /// Room enough: stop.
    Enough,
    /// The last slice found nothing to delete: nothing settled is left.
    NothingLeft,
    /// The group has spent its budget.
    OutOfTime,
}

/// The live size making room aims at: 1/64 below the limit.
pub(crate) fn low_water(limit: u64) -> u64 {
    limit - limit / HEADROOM_DIVISOR
}

/// The decision after a slice that deleted `deleted` rows, leaving `live`
/// bytes of live data, `spent` into making room.
pub(crate) fn next_step(live: u64, limit: u64, deleted: u64, spent: Duration) -> Step {
    if deleted == 0 {
        return Step::NothingLeft;
    }
    if live < low_water(limit) || (live < limit && spent >= SOFT_BUDGET) {
        return Step::Enough;
    }
    if spent >= HARD_BUDGET {
        return Step::OutOfTime;
    }
    Step::More
}

/// What making room did for one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Room {
    /// Rows purged (in the group's transaction, not yet committed).
    pub(crate) purged: StatusCounts,
    /// Why the group's submits are refused, when the live data is still at
    /// the limit.
    pub(crate) refusal: Option<String>,
}

/// Measures the live data inside the group's transaction and, at the limit,
/// purges settled rows until there is room (module header). `failed_before`:
/// failed rows created before it (epoch ms) may go too.
pub(crate) fn make_room(
    conn: &Connection,
    page_size: u64,
    limit: u64,
    failed_before: i64,
) -> Result<Room, StoreError> {
    let mut live = live_size(conn, page_size)?;
    let mut room = Room::default();
    if live < limit {
        return Ok(room);
    }
    let started = Instant::now();
    let stop = loop {
        let deleted = purge_for_room(conn, failed_before, SLICE_ROWS)?;
        room.purged = room.purged.plus(deleted);
        live = live_size(conn, page_size)?;
        match next_step(live, limit, deleted.total(), started.elapsed()) {
            Step::More => continue,
            stop => break stop,
        }
    };
    if live >= limit {
        room.refusal = Some(refusal(live, limit, room.purged.total(), stop));
    }
    Ok(room)
}

/// The `storage_full` message of a group making room could not help.
fn refusal(live: u64, limit: u64, purged: u64, stop: Step) -> String {
    let what = format!(
        "the database holds {} of live data (store.max_db_size = {})",
        bytesize::ByteSize(live),
        bytesize::ByteSize(limit)
    );
    match stop {
        Step::OutOfTime => format!(
            "{what}; {purged} settled row(s) purged to make room so far, more at the next submit"
        ),
        _ if purged > 0 => format!(
            "{what}; {purged} settled row(s) purged to make room, and no settled row is left \
             to purge (delivering rows never are)"
        ),
        _ => format!("{what}, and no settled row is left to purge (delivering rows never are)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn low_water_is_a_sixty_fourth_below_the_limit() {
        assert_eq!(low_water(64 * MIB), 63 * MIB);
        assert_eq!(low_water(10), 10);
        assert_eq!(low_water(0), 0);
    }

    #[test]
    fn a_slice_that_deleted_nothing_ends_it() {
        for live in [0, 50 * MIB, 200 * MIB] {
            assert_eq!(
                next_step(live, 100 * MIB, 0, Duration::ZERO),
                Step::NothingLeft
            );
        }
    }

    #[test]
    fn it_goes_on_to_the_low_water_mark_within_the_soft_budget() {
        let limit = 64 * MIB;
        let early = Duration::from_millis(1);
        assert_eq!(next_step(limit, limit, 128, early), Step::More);
        assert_eq!(next_step(limit - 1, limit, 128, early), Step::More);
        assert_eq!(next_step(low_water(limit), limit, 128, early), Step::More);
        assert_eq!(
            next_step(low_water(limit) - 1, limit, 128, early),
            Step::Enough
        );
    }

    #[test]
    fn past_the_soft_budget_under_the_limit_is_enough() {
        let limit = 64 * MIB;
        assert_eq!(next_step(limit - 1, limit, 128, SOFT_BUDGET), Step::Enough);
        // Still over: go on, up to the hard budget.
        assert_eq!(next_step(limit, limit, 128, SOFT_BUDGET), Step::More);
        assert_eq!(next_step(limit, limit, 128, HARD_BUDGET), Step::OutOfTime);
        assert_eq!(next_step(limit - 1, limit, 128, HARD_BUDGET), Step::Enough);
    }

    #[test]
    fn the_refusal_names_the_limit_and_why() {
        let m = refusal(70 * MIB, 64 * MIB, 0, Step::NothingLeft);
        assert!(m.contains("store.max_db_size"), "{m}");
        assert!(m.contains("no settled row is left"), "{m}");
        let m = refusal(70 * MIB, 64 * MIB, 3, Step::NothingLeft);
        assert!(m.contains("3 settled row(s) purged"), "{m}");
        let m = refusal(70 * MIB, 64 * MIB, 9000, Step::OutOfTime);
        assert!(m.contains("more at the next submit"), "{m}");
    }

    /// A database of every status, for the SQL parts.
    mod sql {
        use rusqlite::{params, Connection};

        use super::super::make_room;
        use crate::config::Synchronous;
        use crate::store::open::open_writer_connection;
        use crate::store::write::{live_size, reclaim_slice};
        use crate::store::{now_ms, Status};

        const DAY: i64 = 86_400_000;

        /// `n` rows per (prefix, status, age in days), in this order,
        /// 600-byte bodies.
        fn fill(conn: &Connection, n: usize, plan: &[(&str, Status, i64)]) {
            let now = now_ms();
            for (prefix, status, days) in plan {
                for i in 0..n {
                    conn.execute(
                        "INSERT INTO msg_log (id, msg, status, create_time) VALUES (?1, ?2, ?3, ?4)",
                        params![format!("{prefix}-{i:04}"), "m".repeat(600), status, now - days * DAY],
                    )
                    .unwrap();
                }
            }
        }

        fn ids(conn: &Connection, prefix: &str) -> Vec<String> {
            let mut stmt = conn
                .prepare("SELECT id FROM msg_log WHERE id LIKE ?1 || '-%' ORDER BY rowid")
                .unwrap();
            let rows = stmt.query_map([prefix], |r| r.get(0)).unwrap();
            rows.map(Result::unwrap).collect()
        }

        fn open(dir: &std::path::Path) -> (Connection, u64) {
            let conn = open_writer_connection(
                &crate::store::Database::plain(dir.join("t.db")),
                Synchronous::Normal,
            )
            .unwrap();
            let page_size: i64 = conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap();
            (conn, page_size as u64)
        }

        const PLAN: [(&str, Status, i64); 6] = [
            ("waiting", Status::Delivering, 40),
            ("old-failed", Status::Failed, 30),
            ("delivered", Status::Delivered, 20),
            ("young-failed", Status::Failed, 1),
            ("consumed", Status::Consumed, 10),
            ("fresh", Status::Delivering, 0),
        ];

        #[test]
        fn settled_rows_go_oldest_first_and_only_as_many_as_needed() {
            let dir = tempfile::tempdir().unwrap();
            let (mut conn, page_size) = open(dir.path());
            fill(&conn, 1000, &PLAN);
            let live = live_size(&conn, page_size).unwrap();
            // Room for a little less than now: a few pages' worth goes, in
            // slices of SLICE_ROWS.
            let limit = live - 4 * page_size;
            let tx = conn.transaction().unwrap();
            let room = make_room(&tx, page_size, limit, now_ms() - 7 * DAY).unwrap();
            assert_eq!(room.refusal, None);
            assert!(live_size(&tx, page_size).unwrap() < limit);
            tx.commit().unwrap();
            let purged = room.purged;
            let slice = u64::from(super::super::SLICE_ROWS);
            assert!(
                purged.total() > 0 && purged.total() <= 2 * slice,
                "{purged:?}"
            );
            assert_eq!(purged.total() % slice, 0, "{purged:?}");
            assert_eq!(purged.delivered, purged.total(), "{purged:?}");
            // The oldest delivered rows went, the newest stayed.
            let delivered = ids(&conn, "delivered");
            let gone = 1000 - delivered.len();
            assert_eq!(gone as u64, purged.total());
            assert_eq!(
                delivered.first().map(String::as_str),
                Some(format!("delivered-{gone:04}").as_str())
            );
            for prefix in ["waiting", "old-failed", "young-failed", "consumed", "fresh"] {
                assert_eq!(ids(&conn, prefix).len(), 1000, "{prefix}");
            }
        }

        #[test]
        fn with_nothing_settled_left_it_refuses_and_never_touches_delivering_rows() {
            let dir = tempfile::tempdir().unwrap();
            let (mut conn, page_size) = open(dir.path());
            fill(&conn, 100, &PLAN);
            let tx = conn.transaction().unwrap();
            let room = make_room(&tx, page_size, page_size, now_ms() - 7 * DAY).unwrap();
            tx.commit().unwrap();
            let message = room.refusal.expect("refused");
            assert!(message.contains("store.max_db_size"), "{message}");
            assert!(message.contains("300 settled row(s) purged"), "{message}");
            assert_eq!(room.purged.delivered, 100);
            assert_eq!(room.purged.consumed, 100);
            assert_eq!(
                room.purged.failed, 100,
                "only the failed rows past the grace"
            );
            for prefix in ["waiting", "young-failed", "fresh"] {
                assert_eq!(ids(&conn, prefix).len(), 100, "{prefix}");
            }
            for prefix in ["old-failed", "delivered", "consumed"] {
                assert!(ids(&conn, prefix).is_empty(), "{prefix}");
            }
            // Again: nothing left, nothing purged, still refused.
            let room = make_room(&conn, page_size, page_size, now_ms() - 7 * DAY).unwrap();
            assert_eq!(room.purged.total(), 0);
            assert!(room.refusal.is_some());
        }

        #[test]
        fn under_the_limit_nothing_is_purged() {
            let dir = tempfile::tempdir().unwrap();
            let (conn, page_size) = open(dir.path());
            fill(&conn, 100, &PLAN);
            let live = live_size(&conn, page_size).unwrap();
            let room = make_room(&conn, page_size, live + 1, 0).unwrap();
            assert_eq!(room, super::super::Room::default());
        }

        /// Free pages are not live data; the reclaim hands every one back,
        /// a bounded slice at a time.
        #[test]
        fn free_pages_are_not_live_and_reclaim_runs_to_the_end_in_slices() {
            let dir = tempfile::tempdir().unwrap();
            let (conn, page_size) = open(dir.path());
            fill(&conn, 2000, &[("a", Status::Delivered, 1)]);
            let pages = |name: &str| -> i64 {
                conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
                    .unwrap()
            };
            let before = pages("page_count");
            let live = live_size(&conn, page_size).unwrap();
            conn.execute("DELETE FROM msg_log", []).unwrap();
            let free = pages("freelist_count");
            assert!(free > 100, "{free} free pages");
            assert_eq!(pages("page_count"), before, "deleting does not shrink");
            assert!(live_size(&conn, page_size).unwrap() < live / 10);
            let mut slices = 0;
            while !reclaim_slice(&conn, std::time::Duration::ZERO)
                .unwrap()
                .done
            {
                slices += 1;
                assert!(slices < 100_000, "the reclaim never ends");
            }
            // A zero budget moves one page per slice.
            assert!(
                slices as i64 >= free - 1,
                "{slices} slices for {free} pages"
            );
            assert_eq!(pages("freelist_count"), 0);
            assert!(pages("page_count") <= before - free, "the file shrank");
        }
    }
}
