//! Store types: what the rest of the agent hands to the store and gets
//! back from it.
//!
//! Owns [`Status`] (the four places a message can be) with its SQL column
//! encoding and the one table of allowed moves ([`TRANSITIONS`], [`Move`]),
//! the row shapes ([`Row`], [`OutgoingRow`], [`StatusCounts`]), the write inputs
//! ([`NewMessage`], [`PublishOutcome`], [`Consumption`], [`PurgeCutoffs`],
//! [`RetryPolicy`]) and their answers ([`Inserted`], [`ConsumeVerdict`]).
//!
//! Invariants: these are plain data; what a write does with them is
//! `store/write.rs`. No status moves except as [`TRANSITIONS`] says
//! (docs/storage.md, Statuses and transitions); a status code no [`Status`]
//! has is an error when read, never a guess.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::Serialize;

/// Where a message is in its life (docs/storage.md, Statuses and
/// transitions). The discriminants are the codes `msg_log.status` holds:
/// this enum is the one place in the code that writes them down; SQL binds
/// [`Status`] values ([`ToSql`]) and reads them back ([`FromSql`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Stored; not yet confirmed by the broker.
    Delivering = 0,
    /// The broker confirmed it.
    Delivered = 1,
    /// Publish attempts exhausted, or the consumer gave up.
    Failed = 2,
    /// The consumer handled it.
    Consumed = 3,
}

/// One status change the store makes, and what makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    pub(crate) from: Status,
    pub(crate) to: Status,
    /// What makes this move (for the reader of the table and the docs).
    pub(crate) why: &'static str,
}

/// Every status change allowed, the one table of them (docs/storage.md,
/// Statuses and transitions). Each guard of the write SQL is built from it
/// (`store/write.rs`); no other move ever happens.
pub(crate) const TRANSITIONS: [Transition; 6] = [
    Transition {
        from: Status::Delivering,
        to: Status::Delivered,
        why: "the broker confirmed the publish",
    },
    Transition {
        from: Status::Delivering,
        to: Status::Consumed,
        why: "the consumer handled it (before its confirm arrived)",
    },
    Transition {
        from: Status::Delivered,
        to: Status::Consumed,
        why: "the consumer handled it",
    },
    Transition {
        from: Status::Delivering,
        to: Status::Failed,
        why: "publish.max_attempts attempts failed, it expired, the consumer gave up, or an operator's discard",
    },
    Transition {
        from: Status::Delivered,
        to: Status::Failed,
        why: "the consumer gave up (consumer.max_attempts)",
    },
    Transition {
        from: Status::Failed,
        to: Status::Delivering,
        why: "an operator's retry",
    },
];

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Delivering,
        Status::Delivered,
        Status::Failed,
        Status::Consumed,
    ];

    /// The code stored in `msg_log.status`.
    pub const fn code(self) -> i64 {
        self as i64
    }

    pub(crate) fn from_code(code: i64) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.code() == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Delivering => "delivering",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
            Status::Consumed => "consumed",
        }
    }

    pub fn from_name(name: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether [`TRANSITIONS`] lets a row move from `self` to `to`.
    pub(crate) const fn can_move(self, to: Status) -> bool {
        // A `while` loop: `const fn` cannot iterate.
        let mut i = 0;
        while i < TRANSITIONS.len() {
            let t = TRANSITIONS[i];
            if t.from as i64 == self as i64 && t.to as i64 == to as i64 {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// A status change one statement of the write SQL makes: its guard
/// (`WHERE status = from`) and its new status, bound as parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Move {
    pub(crate) from: Status,
    pub(crate) to: Status,
}

impl Move {
    /// A move [`TRANSITIONS`] allows. Only ever evaluated in `const` items,
    /// so a move outside the table fails the build, never a running agent.
    pub(crate) const fn allowed(from: Status, to: Status) -> Move {
        assert!(from.can_move(to), "this status move is not in TRANSITIONS");
        Move { from, to }
    }
}

impl ToSql for Status {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.code()))
    }
}

impl FromSql for Status {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let code = value.as_i64()?;
        Status::from_code(code).ok_or_else(|| FromSqlError::Other(Box::new(UnknownStatus(code))))
    }
}

/// A `status` code no [`Status`] has: the file was changed by something
/// other than this agent.
#[derive(Debug, thiserror::Error)]
#[error("msg_log.status {0} is not a status this agent knows")]
pub(crate) struct UnknownStatus(i64);

/// A message accepted on the socket, ready to be stored.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub body: Vec<u8>,
    pub exchange: String,
    pub routing_key: String,
    /// AMQP headers as a JSON object text.
    pub headers: Option<String>,
    pub content_type: String,
    /// 0 (the default) to [`MAX_PRIORITY`]: the backlog goes out highest
    /// first (docs/forwarding.md, Passes).
    pub priority: u8,
    /// Milliseconds from the submit after which the row is never published;
    /// `None`: the agent's `publish.max_age`, if it has one.
    pub ttl_ms: Option<i64>,
}

/// The highest priority a message can have (AMQP's 0-9).
pub const MAX_PRIORITY: u8 = 9;

/// What `last_error` says of a row that expired before it was published.
pub const EXPIRED: &str = "expired";

/// Where a backlog walk is: the priority it reads and the last rowid it
/// read there (`None`: none yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub priority: u8,
    pub rowid: Option<i64>,
}

impl Cursor {
    /// The head of the backlog: the highest priority, nothing read.
    pub const START: Cursor = Cursor {
        priority: MAX_PRIORITY,
        rowid: None,
    };
}

/// The backlog per priority: `by_priority[p]` delivering rows have priority `p`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub by_priority: [u64; MAX_PRIORITY as usize + 1],
}

/// What storing a [`NewMessage`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Inserted {
    /// A row with this id already existed; nothing was stored.
    pub(crate) duplicate: bool,
    /// Settled rows purged, in the commit that stored this message, to make
    /// room under `store.max_db_size` (docs/storage.md, Making room).
    pub(crate) made_room: u64,
}

/// One row of `msg_log`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) id: String,
    pub(crate) status: Status,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) try_count: i64,
    pub(crate) next_try_time: Option<i64>,
    pub(crate) create_time: Option<i64>,
    pub(crate) update_time: Option<i64>,
    pub(crate) last_error: Option<String>,
    pub(crate) headers: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) priority: u8,
    /// Epoch ms after which it is never published; `None`: never expires.
    pub(crate) expire_time: Option<i64>,
    #[serde(skip)]
    pub(crate) body: Vec<u8>,
    /// `msg` is stored as TEXT (valid UTF-8) rather than a BLOB.
    #[serde(skip)]
    pub(crate) body_is_text: bool,
}

/// Rows per status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StatusCounts {
    pub delivering: u64,
    pub delivered: u64,
    pub failed: u64,
    pub consumed: u64,
}

impl StatusCounts {
    /// Adds `n` rows of `status`.
    pub(crate) fn add(&mut self, status: Status, n: u64) {
        match status {
            Status::Delivering => self.delivering += n,
            Status::Delivered => self.delivered += n,
            Status::Failed => self.failed += n,
            Status::Consumed => self.consumed += n,
        }
    }

    pub fn total(&self) -> u64 {
        self.delivering + self.delivered + self.failed + self.consumed
    }

    /// Sums two counts.
    pub fn plus(self, other: StatusCounts) -> StatusCounts {
        StatusCounts {
            delivering: self.delivering + other.delivering,
            delivered: self.delivered + other.delivered,
            failed: self.failed + other.failed,
            consumed: self.consumed + other.consumed,
        }
    }
}

/// Rows the purge may delete (docs/purge.md): delivered and consumed rows
/// created before `settled_before`, failed rows created before
/// `failed_before`. Never a delivering row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeCutoffs {
    pub settled_before: i64,
    pub failed_before: i64,
}

impl PurgeCutoffs {
    /// The statuses `settled_before` applies to.
    pub(crate) const SETTLED: [Status; 2] = [Status::Delivered, Status::Consumed];
    /// The status `failed_before` applies to.
    pub(crate) const FAILED: Status = Status::Failed;
}

/// A delivery as the consumer saw it (enough to insert the row for a
/// message this agent did not publish).
#[derive(Debug, Clone)]
pub(crate) struct Delivered {
    pub(crate) id: String,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) body: Vec<u8>,
    pub(crate) headers: Option<String>,
    pub(crate) content_type: Option<String>,
}

#[cfg(test)]
impl Delivered {
    /// A delivery of `id` for unit tests: exchange `ex`, key `rk`, body `body`.
    pub(crate) fn sample(id: &str) -> Delivered {
        Delivered {
            id: id.into(),
            exchange: "ex".into(),
            routing_key: "rk".into(),
            body: b"body".to_vec(),
            headers: None,
            content_type: None,
        }
    }
}

/// What the handler made of a delivery.
#[derive(Debug, Clone)]
pub(crate) enum Consumption {
    /// The handler succeeded: consumed (from delivering or delivered;
    /// inserted if missing).
    Succeeded(Delivered),
    /// The handler failed: one more attempt counted in `consume_count`; at
    /// `max_attempts` the row becomes failed (from delivering or delivered).
    Failed {
        delivery: Delivered,
        error: String,
        max_attempts: u32,
    },
}

/// What the consumer does with the delivery after the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConsumeVerdict {
    /// Recorded as consumed (or already settled): ack.
    Ack,
    /// Failed `attempts` times, fewer than allowed: nack with requeue.
    Requeue { attempts: u32 },
    /// Failed for the last time: reject without requeue (dead-letter).
    GiveUp { attempts: u32 },
}

/// What one publish attempt of a row came to, as the store records it.
/// ("Unknown" outcomes are not recorded: the row simply stays due.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PublishOutcome {
    /// Broker ack without a return: delivering → delivered.
    Delivered { id: String },
    /// Nack, return, channel closed because of it, or a confirm timeout on a
    /// live connection: one failed attempt.
    Rejected { id: String, error: String },
}

/// How failed attempts are spaced and when they end (from `[publish]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    pub(crate) max_attempts: u32,
    pub(crate) retry_interval_ms: i64,
}

/// A row due for publishing, as the forwarder reads it.
#[derive(Debug, Clone)]
pub struct OutgoingRow {
    /// Insertion order: the backlog cursor.
    pub rowid: i64,
    pub id: String,
    pub body: Vec<u8>,
    pub exchange: String,
    pub routing_key: String,
    pub headers: Option<String>,
    pub content_type: Option<String>,
    pub create_time: Option<i64>,
    pub priority: u8,
    /// Epoch ms after which it must not be published.
    pub expire_time: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    use Status::{Consumed, Delivered, Delivering, Failed};

    #[test]
    fn the_transition_table_is_the_documented_one() {
        // docs/storage.md, Statuses and transitions, as (from, to) pairs.
        let documented = [
            (Delivering, Delivered),
            (Delivering, Consumed),
            (Delivered, Consumed),
            (Delivering, Failed),
            (Delivered, Failed),
            (Failed, Delivering),
        ];
        let table: Vec<_> = TRANSITIONS.iter().map(|t| (t.from, t.to)).collect();
        assert_eq!(table, documented);
        for t in TRANSITIONS {
            assert_ne!(t.from, t.to, "a move changes the status");
            assert!(!t.why.is_empty());
        }
    }

    #[test]
    fn can_move_answers_exactly_the_table() {
        for from in Status::ALL {
            for to in Status::ALL {
                let listed = TRANSITIONS.iter().any(|t| t.from == from && t.to == to);
                assert_eq!(from.can_move(to), listed, "{from:?} -> {to:?}");
            }
        }
        assert!(
            Status::ALL.iter().all(|&to| !Consumed.can_move(to)),
            "consumed is final"
        );
    }

    #[test]
    fn a_status_round_trips_through_sqlite_and_an_unknown_code_is_an_error() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        for status in Status::ALL {
            let back: Status = conn.query_row("SELECT ?1", [status], |r| r.get(0)).unwrap();
            assert_eq!(back, status);
            assert_eq!(Status::from_name(status.name()), Some(status));
        }
        let bad = Status::ALL.iter().map(|s| s.code()).max().unwrap() + 1;
        let err = conn
            .query_row("SELECT ?1", [bad], |r| r.get::<_, Status>(0))
            .unwrap_err();
        assert!(
            err.to_string().contains("not a status this agent knows"),
            "{err}"
        );
    }
}
