//! Consume: the idempotent manual-ack consumer (docs/consuming.md).
//!
//! Role: when `consumer.queue` is set, declare the configured topology,
//! consume the queue with manual acks and run each message's effect once,
//! however often the broker delivers it.
//!
//! Owns: its own AMQP connection and reconnect loop (separate from the
//! forwarder's, so a slow handler never holds up publishing), the running
//! handlers, the handler processes.
//!
//! Per delivery, keyed by its `message_id` (docs/consuming.md, The decision
//! on a delivery):
//! 1. the row is status 3 (consumed) already → ack, log a duplicate, run
//!    nothing;
//! 2. else run the handler; on success commit status 3 (inserting the row for
//!    a message this agent did not publish; a failed row stays failed) and
//!    only then ack;
//! 3. on failure count the attempt in the row (`consume_count`: a restart
//!    does not reset it); below `consumer.max_attempts` → nack with requeue;
//!    at it → reject without requeue (dead-lettered when
//!    `consumer.dead_letter_exchange` is set) and the row becomes status 2
//!    (failed).
//!
//! A delivery without `message_id` runs without deduplication; the
//! broker's `redelivered` flag stands in for the attempt count
//! (docs/consuming.md, Deliveries without `message_id`).
//!
//! Invariants:
//! - The ack follows the commit. An ack lost on a dead channel is harmless:
//!   the broker redelivers, the row says 3, step 1 acks it.
//! - Dedupe is on `message_id`: copies of one id in flight together run the
//!   handler once (the later copy waits, then finds status 3).
//! - Nothing is decided without the database: when the store cannot answer,
//!   the delivery goes back to the queue after a pause.
//! - A declaration the broker refuses (406: the queue exists with other
//!   arguments) is reported and retried slowly, never in a hot loop
//!   (docs/consuming.md, Topology).
//! - On shutdown no new delivery is taken; running handlers get until the
//!   drain bound; unacked deliveries go back to the queue when the channel
//!   closes. A lost connection lets running handlers finish (bounded), then
//!   reconnects (docs/consuming.md, Connection loss and shutdown).
//!
//! Files, by role:
//! - `consumer`: the task: its link to the broker (down, up, stopped), the
//!   delivery loop, the shutdown drain;
//! - `topology`: the exchanges, queue, bindings, dead-letter exchange and
//!   prefetch it declares;
//! - `delivery`: one delivery from arrival to ack, the I/O around `decision`;
//! - `decision`: what to do with a delivery, pure (no I/O);
//! - `in_flight`: one handler run at a time per `message_id`;
//! - `handler`: the effect of a message (`record`, `exec`);
//! - `message`: what the consumer keeps of a delivery;
//! - `headers`: AMQP headers as the JSON `msg_log.headers` holds.

mod consumer;
mod decision;
mod delivery;
mod handler;
mod in_flight;
mod message;
pub(crate) mod topology;

pub(crate) use consumer::Consumer;

use crate::store::StoreError;

/// The consumer task's error, for a signature like the other tasks'.
/// Nothing produces one today: the broker's failures are retried, and a
/// delivery the store cannot record goes back to the queue.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConsumeError {
    #[error(transparent)]
    Store(#[from] StoreError),
}
