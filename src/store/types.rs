//! Store types: what the rest of the agent hands to the store and gets
//! back from it.
//!
//! Owns [`Status`] (the four places a message can be), the row shapes
//! ([`Row`], [`OutgoingRow`], [`StatusCounts`]), the write inputs
//! ([`NewMessage`], [`PublishOutcome`], [`Consumption`], [`PurgeCutoffs`],
//! [`RetryPolicy`]) and their answers ([`Inserted`], [`ConsumeVerdict`]).
//!
//! Invariant: these are plain data; what a write does with them is
//! `store/write.rs`, and which status moves are allowed is the one table here
//! (docs/storage.md, Statuses and transitions).

use serde::Serialize;

/// Where a message is in its life. Only moves forward (see the spec), except
/// by an explicit `retry` (2 → 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Delivering = 0,
    Delivered = 1,
    Failed = 2,
    Consumed = 3,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Delivering,
        Status::Delivered,
        Status::Failed,
        Status::Consumed,
    ];

    pub fn from_code(code: i64) -> Option<Status> {
        Status::ALL.into_iter().find(|s| *s as i64 == code)
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
}

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
}

/// What storing a [`NewMessage`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    /// A row with this id already existed; nothing was stored.
    pub duplicate: bool,
}

/// One row of `msg_log`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: String,
    pub status: Status,
    pub exchange: String,
    pub routing_key: String,
    pub try_count: i64,
    pub next_try_time: Option<i64>,
    pub create_time: Option<i64>,
    pub update_time: Option<i64>,
    pub last_error: Option<String>,
    pub headers: Option<String>,
    pub content_type: Option<String>,
    #[serde(skip)]
    pub body: Vec<u8>,
    /// `msg` is stored as TEXT (valid UTF-8) rather than a BLOB.
    #[serde(skip)]
    pub body_is_text: bool,
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
    /// Adds `n` rows of status code `status` (unknown codes are ignored).
    pub fn add(&mut self, status: i64, n: u64) {
        match Status::from_code(status) {
            Some(Status::Delivering) => self.delivering += n,
            Some(Status::Delivered) => self.delivered += n,
            Some(Status::Failed) => self.failed += n,
            Some(Status::Consumed) => self.consumed += n,
            None => {}
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

/// Rows the purge may delete: status 1 and 3 created before
/// `settled_before`, status 2 created before `failed_before`. Never status 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeCutoffs {
    pub settled_before: i64,
    pub failed_before: i64,
}

/// A delivery as the consumer saw it (enough to insert the row for a
/// message this agent did not publish).
#[derive(Debug, Clone)]
pub struct Delivered {
    pub id: String,
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub headers: Option<String>,
    pub content_type: Option<String>,
}

/// What the handler made of a delivery.
#[derive(Debug, Clone)]
pub enum Consumption {
    /// The handler succeeded: status 3 (from 0 or 1; inserted if missing).
    Succeeded(Delivered),
    /// The handler failed: one more attempt counted in `consume_count`; at
    /// `max_attempts` the row becomes status 2 (from 0 or 1).
    Failed {
        delivery: Delivered,
        error: String,
        max_attempts: u32,
    },
}

/// What the consumer does with the delivery after the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumeVerdict {
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
pub enum PublishOutcome {
    /// Broker ack without a return: status 0 → 1.
    Delivered { id: String },
    /// Nack, return, channel closed because of it, or a confirm timeout on a
    /// live connection: one failed attempt.
    Rejected { id: String, error: String },
}

/// How failed attempts are spaced and when they end (from `[publish]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub retry_interval_ms: i64,
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
}
